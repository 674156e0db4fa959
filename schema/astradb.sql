-- The astra database schema, generated from astra_provider.database.astradb by `astra schema`.

-- Load into an empty PostgreSQL database with:  psql < schema/astradb.sql

CREATE SCHEMA IF NOT EXISTS astra;

CREATE TABLE astra.bundle (
	pk BIGSERIAL NOT NULL,
	task_module TEXT NOT NULL,
	task_name TEXT NOT NULL,
	bundled_parameters JSONB NOT NULL,
	n_tasks INTEGER NOT NULL,
	created TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	time_pre_execute FLOAT,
	time_execute FLOAT,
	time_post_execute FLOAT,
	time_pre_execute_overhead FLOAT,
	time_execute_overhead FLOAT,
	time_post_execute_overhead FLOAT,
	PRIMARY KEY (pk)
);

CREATE TABLE astra.data_product (
	pk BIGSERIAL NOT NULL,
	release TEXT DEFAULT '' NOT NULL,
	filetype TEXT NOT NULL,
	kwargs JSONB NOT NULL,
	kwargs_hash TEXT NOT NULL,
	path TEXT NOT NULL,
	metadata JSONB,
	created TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	PRIMARY KEY (pk),
	UNIQUE (kwargs_hash, release, filetype)
);

CREATE TABLE astra.lease (
	pk BIGSERIAL NOT NULL,
	owner TEXT NOT NULL,
	host TEXT NOT NULL,
	pid INTEGER NOT NULL,
	created TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	renewed TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	expires TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (pk)
);

CREATE TABLE astra.output_interface (
	pk BIGSERIAL NOT NULL,
	table_name TEXT NOT NULL,
	created TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	PRIMARY KEY (pk)
);

CREATE TABLE astra.parameter (
	pk BIGSERIAL NOT NULL,
	parameter_name TEXT NOT NULL,
	parameter_value TEXT NOT NULL,
	parameter_value_hash TEXT NOT NULL,
	PRIMARY KEY (pk),
	UNIQUE (parameter_name, parameter_value_hash)
);

CREATE TABLE astra.source (
	pk BIGSERIAL NOT NULL,
	catalogid BIGINT,
	obj TEXT,
	ra FLOAT,
	dec FLOAT,
	PRIMARY KEY (pk),
	UNIQUE (catalogid),
	UNIQUE (obj)
);

CREATE TABLE astra.source_data_product (
	pk BIGSERIAL NOT NULL,
	source_pk BIGINT NOT NULL,
	data_product_pk BIGINT NOT NULL,
	PRIMARY KEY (pk),
	UNIQUE (source_pk, data_product_pk),
	FOREIGN KEY(source_pk) REFERENCES astra.source (pk) ON DELETE CASCADE,
	FOREIGN KEY(data_product_pk) REFERENCES astra.data_product (pk) ON DELETE CASCADE
);

CREATE INDEX ix_astra_source_data_product_data_product_pk ON astra.source_data_product (data_product_pk);

CREATE INDEX ix_astra_source_data_product_source_pk ON astra.source_data_product (source_pk);

CREATE TABLE astra.task (
	pk BIGSERIAL NOT NULL,
	task_module TEXT NOT NULL,
	task_name TEXT NOT NULL,
	task_id TEXT NOT NULL,
	version TEXT NOT NULL,
	status_code SMALLINT DEFAULT '0' NOT NULL,
	created TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	modified TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
	duration FLOAT,
	time_pre_execute FLOAT,
	time_execute FLOAT,
	time_post_execute FLOAT,
	time_bundle_overhead FLOAT,
	error_stage TEXT,
	error_message TEXT,
	error_traceback TEXT,
	result JSONB,
	output_pk BIGINT,
	bundle_pk BIGINT,
	claim SMALLINT,
	lease_pk BIGINT,
	PRIMARY KEY (pk),
	FOREIGN KEY(output_pk) REFERENCES astra.output_interface (pk) ON DELETE SET NULL,
	FOREIGN KEY(bundle_pk) REFERENCES astra.bundle (pk) ON DELETE SET NULL,
	FOREIGN KEY(lease_pk) REFERENCES astra.lease (pk) ON DELETE SET NULL
);

CREATE INDEX ix_astra_task_bundle_pk ON astra.task (bundle_pk);

CREATE INDEX ix_astra_task_output_pk ON astra.task (output_pk);

CREATE UNIQUE INDEX ux_task_claim ON astra.task (task_id, version, claim);

CREATE TABLE astra.version_parameter (
	version TEXT NOT NULL,
	parameter_pk BIGINT NOT NULL,
	PRIMARY KEY (version, parameter_pk),
	FOREIGN KEY(parameter_pk) REFERENCES astra.parameter (pk) ON DELETE CASCADE
);

CREATE TABLE astra.continuum (
	row_index INTEGER NOT NULL,
	snr FLOAT,
	n_continuum_pixels INTEGER,
	rms_residual FLOAT,
	bitmask_flag INTEGER NOT NULL,
	output_pk BIGINT NOT NULL,
	task_pk BIGINT NOT NULL,
	data_product_pk BIGINT,
	PRIMARY KEY (output_pk),
	FOREIGN KEY(output_pk) REFERENCES astra.output_interface (pk) ON DELETE RESTRICT,
	FOREIGN KEY(task_pk) REFERENCES astra.task (pk) ON DELETE CASCADE,
	FOREIGN KEY(data_product_pk) REFERENCES astra.data_product (pk) ON DELETE SET NULL
);

CREATE INDEX ix_astra_continuum_data_product_pk ON astra.continuum (data_product_pk);

CREATE INDEX ix_astra_continuum_task_pk ON astra.continuum (task_pk);

CREATE TABLE astra.doppler (
	row_index INTEGER NOT NULL,
	vhelio FLOAT,
	vrel FLOAT,
	u_vrel FLOAT,
	bc FLOAT,
	teff FLOAT,
	u_teff FLOAT,
	logg FLOAT,
	u_logg FLOAT,
	fe_h FLOAT,
	u_fe_h FLOAT,
	chisq FLOAT,
	ccf_peak FLOAT,
	model_mismatch FLOAT,
	template_grid TEXT,
	snr FLOAT,
	bitmask_flag INTEGER NOT NULL,
	output_pk BIGINT NOT NULL,
	task_pk BIGINT NOT NULL,
	data_product_pk BIGINT,
	PRIMARY KEY (output_pk),
	FOREIGN KEY(output_pk) REFERENCES astra.output_interface (pk) ON DELETE RESTRICT,
	FOREIGN KEY(task_pk) REFERENCES astra.task (pk) ON DELETE CASCADE,
	FOREIGN KEY(data_product_pk) REFERENCES astra.data_product (pk) ON DELETE SET NULL
);

CREATE INDEX ix_astra_doppler_data_product_pk ON astra.doppler (data_product_pk);

CREATE INDEX ix_astra_doppler_task_pk ON astra.doppler (task_pk);

CREATE TABLE astra.random_number_generator (
	samples JSONB NOT NULL,
	output_pk BIGINT NOT NULL,
	task_pk BIGINT NOT NULL,
	data_product_pk BIGINT,
	PRIMARY KEY (output_pk),
	FOREIGN KEY(output_pk) REFERENCES astra.output_interface (pk) ON DELETE RESTRICT,
	FOREIGN KEY(task_pk) REFERENCES astra.task (pk) ON DELETE CASCADE,
	FOREIGN KEY(data_product_pk) REFERENCES astra.data_product (pk) ON DELETE SET NULL
);

CREATE INDEX ix_astra_random_number_generator_data_product_pk ON astra.random_number_generator (data_product_pk);

CREATE INDEX ix_astra_random_number_generator_task_pk ON astra.random_number_generator (task_pk);

CREATE TABLE astra.task_input_data_product (
	pk BIGSERIAL NOT NULL,
	task_pk BIGINT NOT NULL,
	data_product_pk BIGINT NOT NULL,
	PRIMARY KEY (pk),
	FOREIGN KEY(task_pk) REFERENCES astra.task (pk) ON DELETE CASCADE,
	FOREIGN KEY(data_product_pk) REFERENCES astra.data_product (pk) ON DELETE CASCADE
);

CREATE INDEX ix_astra_task_input_data_product_data_product_pk ON astra.task_input_data_product (data_product_pk);

CREATE INDEX ix_astra_task_input_data_product_task_pk ON astra.task_input_data_product (task_pk);

CREATE TABLE astra.task_output_data_product (
	pk BIGSERIAL NOT NULL,
	task_pk BIGINT NOT NULL,
	data_product_pk BIGINT NOT NULL,
	PRIMARY KEY (pk),
	FOREIGN KEY(task_pk) REFERENCES astra.task (pk) ON DELETE CASCADE,
	FOREIGN KEY(data_product_pk) REFERENCES astra.data_product (pk) ON DELETE CASCADE
);

CREATE INDEX ix_astra_task_output_data_product_data_product_pk ON astra.task_output_data_product (data_product_pk);

CREATE INDEX ix_astra_task_output_data_product_task_pk ON astra.task_output_data_product (task_pk);

CREATE TABLE astra.task_parameter_link (
	pk BIGSERIAL NOT NULL,
	task_pk BIGINT NOT NULL,
	parameter_pk BIGINT NOT NULL,
	PRIMARY KEY (pk),
	FOREIGN KEY(task_pk) REFERENCES astra.task (pk) ON DELETE CASCADE,
	FOREIGN KEY(parameter_pk) REFERENCES astra.parameter (pk) ON DELETE CASCADE
);

CREATE INDEX ix_astra_task_parameter_link_parameter_pk ON astra.task_parameter_link (parameter_pk);

CREATE INDEX ix_astra_task_parameter_link_task_pk ON astra.task_parameter_link (task_pk);

CREATE TABLE astra.thecannon (
	row_index INTEGER NOT NULL,
	snr FLOAT,
	teff FLOAT,
	e_teff FLOAT,
	logg FLOAT,
	e_logg FLOAT,
	fe_h FLOAT,
	e_fe_h FLOAT,
	rho_teff_logg FLOAT,
	rho_teff_fe_h FLOAT,
	rho_logg_fe_h FLOAT,
	chi_sq FLOAT,
	reduced_chi_sq FLOAT,
	bitmask_flag INTEGER NOT NULL,
	labels JSONB,
	output_pk BIGINT NOT NULL,
	task_pk BIGINT NOT NULL,
	data_product_pk BIGINT,
	PRIMARY KEY (output_pk),
	FOREIGN KEY(output_pk) REFERENCES astra.output_interface (pk) ON DELETE RESTRICT,
	FOREIGN KEY(task_pk) REFERENCES astra.task (pk) ON DELETE CASCADE,
	FOREIGN KEY(data_product_pk) REFERENCES astra.data_product (pk) ON DELETE SET NULL
);

CREATE INDEX ix_astra_thecannon_data_product_pk ON astra.thecannon (data_product_pk);

CREATE INDEX ix_astra_thecannon_task_pk ON astra.thecannon (task_pk);

CREATE TABLE astra.thepayne (
	row_index INTEGER NOT NULL,
	snr FLOAT,
	teff FLOAT,
	e_teff FLOAT,
	logg FLOAT,
	e_logg FLOAT,
	fe_h FLOAT,
	e_fe_h FLOAT,
	rho_teff_logg FLOAT,
	rho_teff_fe_h FLOAT,
	rho_logg_fe_h FLOAT,
	chi_sq FLOAT,
	reduced_chi_sq FLOAT,
	bitmask_flag INTEGER NOT NULL,
	labels JSONB,
	output_pk BIGINT NOT NULL,
	task_pk BIGINT NOT NULL,
	data_product_pk BIGINT,
	PRIMARY KEY (output_pk),
	FOREIGN KEY(output_pk) REFERENCES astra.output_interface (pk) ON DELETE RESTRICT,
	FOREIGN KEY(task_pk) REFERENCES astra.task (pk) ON DELETE CASCADE,
	FOREIGN KEY(data_product_pk) REFERENCES astra.data_product (pk) ON DELETE SET NULL
);

CREATE INDEX ix_astra_thepayne_data_product_pk ON astra.thepayne (data_product_pk);

CREATE INDEX ix_astra_thepayne_task_pk ON astra.thepayne (task_pk);

CREATE OR REPLACE VIEW astra.task_parameter AS
SELECT l.pk, l.task_pk, l.parameter_pk FROM astra.task_parameter_link AS l
UNION ALL
SELECT CAST(NULL AS BIGINT) AS pk, t.pk AS task_pk, v.parameter_pk FROM astra.task AS t
JOIN astra.version_parameter AS v ON v.version = t.version;
